"""Config -> loaded, warmed routers on their device: router classes, weights, devices."""
