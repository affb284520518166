//! ADS client: state of the world and delta, ACK/NACK, warming, last good config.
