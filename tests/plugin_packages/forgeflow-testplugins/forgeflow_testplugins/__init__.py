"""Test plugins for ForgeFlow: well-behaved chain tools and tools that fail in every way a plugin can."""
