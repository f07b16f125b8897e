"""Elastic family: one set of weights, many models.

- BigNAS (Yu et al., 2020): a supernet whose children are slices of shared weights, trained with the
  sandwich rule and in-place distillation; children used without retraining (``bignas.py``).
- Learngene with stage-wise weight sharing: a compact learngene learned on an ancestry model, expanded
  into descendant models of any depth (``learngene.py``).
- D2NWG: a weight VAE over a zoo of trained models and a latent diffusion model conditioned on a dataset
  embedding, generating weights for unseen datasets (``d2nwg.py``).

The CLI is ``weightlab elastic ...`` (cli/elastic*.py).
"""
