"""Scale-permuted architecture search (Du et al., CVPR 2020, section 3).

`space` holds the search space as data (genotypes, sampler, membership, its
size), `graph` what a block spec list builds (dead blocks, pruning, the
canonical hash), `evolution` regularized evolution and random search,
`proxy` the proxy training of one candidate, `study` the trial storage and
workers, `results` the report. `python -m spinenet_jax.search` runs it.
Models know nothing of this package.
"""
