def make():
    return {'conv': 1, 'bn': 2}
