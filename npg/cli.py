"""Console entry points; each forwards to the module that owns the command."""


def train_main(argv=None):
    from npg.train import main

    return main(argv)


def render_main(argv=None):
    from npg.render import main

    return main(argv)


def prep_main(argv=None):
    from npg.data.prep import main

    return main(argv)


def make_scene_main(argv=None):
    from npg.data.generate import main

    return main(argv)
