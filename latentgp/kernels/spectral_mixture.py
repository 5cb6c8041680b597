# placeholder: being written

def SpectralMixture(*args, **kwargs):
    raise NotImplementedError
