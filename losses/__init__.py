"""One file per training objective; each loss is a pure function of tensors (see ../STYLE in shared/)."""
