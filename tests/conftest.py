import os

# torch brings its own OpenMP runtime; with both spinning after their
# parallel regions, 2 cores run 4 busy threads and the suite crawls.  Set
# before either runtime loads (each reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
