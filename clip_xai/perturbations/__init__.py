"""Image perturbations for the sensitivity study: ``fgsm``, ``pgd``, ``noise`` (random controls) and
``map_attack`` (attacks on the map). ``perturb(model, pixels, tokens, seeds)`` returns the perturbed
[0,1] pixels with what the rows record; calling the object returns the pixels alone."""
