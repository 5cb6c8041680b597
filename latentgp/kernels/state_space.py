# placeholder: being written
class StateSpaceForm:
    pass


def state_space_form(kernel):
    raise NotImplementedError
