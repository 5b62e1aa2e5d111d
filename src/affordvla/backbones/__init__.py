"""VLM backbones behind one interface; each family has its own folder with an offline tiny variant."""
