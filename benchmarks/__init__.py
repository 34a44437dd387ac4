"""The benchmark scripts of st_keras, each run as `python -m benchmarks.NAME`
from the repository root; each writes its section of BENCHMARKS.md or
docs/RESULTS.md. Besides them: common (what the scripts share), ngram (the
byte n-gram baselines of Table 3) and digits_to_cifar (the images table's
data)."""
