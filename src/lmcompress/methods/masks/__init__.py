"""Learned masks: pruning by training real-valued scores per weight (`mask_train`, movement pruning / TAMT)
instead of choosing the weights in one shot; the result is the sparse layers every other method uses."""
