# placeholder: being written

def HidaMatern(*args, **kwargs):
    raise NotImplementedError
