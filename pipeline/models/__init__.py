"""Models: the ViT, the masked autoencoder, masking and schedules, proxy classifiers, checkpoint loading.

Imports only `pipeline.core`."""
