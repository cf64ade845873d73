"""Training: typed recipes, the one loop (:mod:`.loop`), the stage interface it runs (:mod:`.stage`), losses, and
the stage builders (:mod:`.stages`)."""
