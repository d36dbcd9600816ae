"""ctxrepro: a reproduction of Doersch, Gupta, Efros (ICCV 2015), "Unsupervised Visual Representation
Learning by Context Prediction", as a DVC pipeline."""

__version__ = "0.1.0"
