"""data_tools: the preference dataset builder (`align-data`). Imports align; align never imports it."""
