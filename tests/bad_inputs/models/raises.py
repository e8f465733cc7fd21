def make():
    raise RuntimeError('the factory cannot find its config file')
