"""diagnose: will these updates merge? Weight-space conflicts, representation geometry, gradients, and the
statistics and predictor that tie them to measured mergeability (``mergetool diagnose``)."""
