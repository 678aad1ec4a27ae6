"""dropout_lab: train and study dropout-regularized networks on FashionMNIST with PyTorch Lightning."""

__version__ = "0.1.0"
