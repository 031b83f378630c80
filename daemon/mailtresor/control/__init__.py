"""The control endpoint: the key-custody service that releases keys to
appliances (server).  It runs on another host in production and must not
import the daemon's wiring."""
