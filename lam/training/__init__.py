"""Lightning glue: the LightningModule, the DataModule, callbacks, the schedule, checkpoints, precision, and
the run folders a training leaves."""
