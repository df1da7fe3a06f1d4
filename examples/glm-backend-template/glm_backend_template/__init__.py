"""Template backend plugin for glm-runtime. See README.md for the porting steps."""
