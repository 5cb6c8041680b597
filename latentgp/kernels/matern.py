# placeholder: being written

def Matern(*args, **kwargs):
    raise NotImplementedError
