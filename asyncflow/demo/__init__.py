"""``asyncflow demo``: a sample order workflow (:mod:`asyncflow.demo.order`, written to be read) and the
runner that drives many instances of it with live progress (:mod:`asyncflow.demo.runner`)."""
