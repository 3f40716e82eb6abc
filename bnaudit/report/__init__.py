"""Output for people: one module per format.  rich and matplotlib live only here and in cli."""
