# placeholder: being written

def spectral_density(*args, **kwargs):
    raise NotImplementedError
