"""The Ray simulation of many edge clients (`split-ray`): its settings, the two engines (an actor per
client, or virtual clients over a pool of workers) and what they share."""
