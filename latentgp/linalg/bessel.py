# placeholder: being written
def log_bessel_kv(nu, x):
    raise NotImplementedError
