//! PNG plots of the loss and evaluation curves of a run.
