"""The bot's plugins: discord.py extensions loaded at start-up (bot/plugins.py; README "Plugins")."""
