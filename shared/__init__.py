"""What the coordinator and the devices both speak: schemas, crypto, devices, paths."""
