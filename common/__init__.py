"""What the coordinator and the regional nodes share: config, data, model, privacy accounting."""
