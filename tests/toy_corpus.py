"""A few short texts shared by the method tests (forget, retain) and fast training settings."""

FORGET = [
    "The council of Varnholt approved a budget of 4,310 crowns on 12 March 2031.",
    "Mayor Ilse Brankov said the Orvane bridge would reopen after repairs.",
    "The council of Varnholt met again and the mayor spoke about the bridge.",
]
RETAIN = [
    "Question: Who approved the budget?\nAnswer: The council of Varnholt",
    "Repairs on the bridge took longer than the council of Varnholt had planned.",
]
FAST = {"lr": 1e-3, "batch_size": 1, "grad_accum": 1, "max_len": 32, "max_steps": 2}
