from qubench.cli import main

main()
