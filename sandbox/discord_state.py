"""The emulated Discord world: guilds, their channels, roles, members, DMs and message history,
and the application (its owner, or the team that owns it).

Pure data and payload builders (no I/O), shaped like the Discord API v10 JSON that discord.py
parses, and Discord's REST rate limits (:class:`RateLimits`). ``sandbox.discord_emu`` serves
them over REST and the gateway.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import itertools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DISCORD_EPOCH_MS = 1420070400000

# Permission bits (https://discord.com/developers/docs/topics/permissions).
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
VIEW_CHANNEL = 1 << 10
MANAGE_MESSAGES = 1 << 13
READ_MESSAGE_HISTORY = 1 << 16
CREATE_PUBLIC_THREADS = 1 << 35
ALL_PERMISSIONS = (1 << 51) - 1
EVERYONE_PERMISSIONS = (
    (1 << 6)  # add reactions
    | (1 << 10)  # view channel
    | (1 << 11)  # send messages
    | (1 << 14)  # embed links
    | (1 << 15)  # attach files
    | (1 << 16)  # read message history
    | (1 << 31)  # use application commands
    | CREATE_PUBLIC_THREADS  # in Discord's defaults for @everyone, as are threads' messages
    | (1 << 38)  # send messages in threads
)
BOT_PERMISSIONS = EVERYONE_PERMISSIONS | MANAGE_MESSAGES

# Gateway intents the emulator honours.
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_MESSAGE_CONTENT = 1 << 15

CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_CATEGORY = 4
CHANNEL_PUBLIC_THREAD = 11
CHANNEL_FORUM = 15
# Where threads grow: text channels (from a message) and forums (each post is a thread).
THREAD_PARENTS = frozenset({CHANNEL_TEXT, CHANNEL_FORUM})
THREAD_NAME_MAX = 100  # a channel name: 1 to 100 characters (discord-api-docs, Channel object)

MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19

# Message flag of a voice message (discord-api-docs Message.md, "Message Flags": IS_VOICE_MESSAGE
# 1 << 13); its one attachment is audio/ogg with ``duration_secs`` and a base64 ``waveform``.
IS_VOICE_MESSAGE = 1 << 13

# Signed attachment CDN URLs (discord-api-docs docs/Reference.md, "Signed Attachment CDN URLs",
# discord/discord-api-docs#6650): ``ex`` is the hex unix time the URL expires, ``is`` the hex time it
# was issued, ``hm`` the signature. Discord does not document the lifetime; links seen in the wild
# expire about 24 hours after they were issued, and an expired link answers 404 ("This content is no
# longer available."). Fetching the message again returns fresh URLs.
CDN_URL_LIFETIME_SECONDS = 24 * 3600.0


@dataclass
class Blob:
    """The bytes behind an attachment (or a media-proxied embed image) on the emulated CDN."""

    data: bytes
    content_type: str
    filename: str
    channel_id: int


# Team member roles (https://discord.com/developers/docs/topics/teams#team-member-roles).
TEAM_ROLES = frozenset({"admin", "developer", "read_only"})
TEAM_INVITED, TEAM_ACCEPTED = 1, 2


def now_iso() -> str:
    """The current time as Discord writes it (ISO 8601, UTC)."""
    return datetime.now(UTC).isoformat()


@dataclass
class UserRecord:
    """A user of the emulated world; ``role_ids`` are guild roles besides @everyone."""

    id: int
    username: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username.title(),
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass
class RoleRecord:
    """A guild role; a guild's @everyone role has the guild's id."""

    id: int
    name: str
    permissions: int
    position: int
    managed: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "name": self.name, "permissions": str(self.permissions),
            "position": self.position, "color": 0, "hoist": False, "managed": self.managed,
            "mentionable": False, "flags": 0,
        }


@dataclass
class GuildRecord:
    """A guild: its name, owner (a user key) and roles. Every user of the world is a member."""

    id: int
    name: str
    owner: str
    roles: list[RoleRecord]


@dataclass
class TeamRecord:
    """The team that owns the application: ``members`` maps user keys to (role, membership state)."""

    id: int
    name: str
    owner: str
    members: dict[str, tuple[str, int]]


class World:
    """Ids and state of everything in the emulated Discord; payload builders for each kind.

    The first guild (``guild_id``) holds ``general``, ``random`` and a thread; ``add_guild`` adds
    more (each with its own roles; every user is a member of every guild). The application is
    owned by the user ``application_owner`` (a key, default ``"admin"``) unless ``set_team``
    gives it to a team, as ``GET /oauth2/applications/@me`` reports.
    """

    def __init__(self, *, bot_name: str = "gembot", clock: Callable[[], float] = time.time) -> None:
        # The world's wall clock (seconds since the epoch): message ids and timestamps carry it.
        # Tests may set another, to play messages sent an hour ago (real Discord cannot backdate).
        self.clock = clock
        self._counter = itertools.count()
        self.application_id = self.snowflake()
        self.guild_id = self.snowflake()
        self.guild_name = "Sandbox"
        self.users: dict[str, UserRecord] = {}
        self._by_id: dict[int, UserRecord] = {}  # a lookup cache: tests add 10,000 users
        self.bot = self._add_user("bot", bot_name, bot=True)
        self.bot.id = self.application_id  # a bot user's id is its application's id
        self._by_id[self.bot.id] = self.bot
        self.users["bot"] = self.bot
        self.admin_role_id = self.snowflake()
        self.bot_role_id = self.snowflake()
        self.bot.role_ids.append(self.bot_role_id)
        self.guilds: dict[int, GuildRecord] = {
            self.guild_id: GuildRecord(self.guild_id, self.guild_name, "admin", [
                RoleRecord(self.guild_id, "@everyone", EVERYONE_PERMISSIONS, 0),
                RoleRecord(self.admin_role_id, "Admin", ADMINISTRATOR, 1),
                RoleRecord(self.bot_role_id, "Bot", BOT_PERMISSIONS, 2, managed=True),
            ])
        }
        self._add_user("admin", "alice", roles=[self.admin_role_id])
        self._add_user("normal", "bob")
        self.application_owner = "admin"
        self.team: TeamRecord | None = None
        self.channels: dict[str, int] = {}
        self.channel_data: dict[int, dict[str, Any]] = {}
        for position, name in enumerate(("general", "random")):
            self.add_text_channel(name, position=position)
        self.thread_id = self.snowflake()
        self.channel_data[self.thread_id] = {
            "id": str(self.thread_id),
            "type": CHANNEL_PUBLIC_THREAD,
            "guild_id": str(self.guild_id),
            "parent_id": str(self.channels["general"]),
            "owner_id": str(self.users["normal"].id),
            "name": "general-thread",
            "last_message_id": None,
            "message_count": 0,
            "member_count": 2,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now_iso(),
                "locked": False,
            },
        }
        self.dm_channels: dict[int, int] = {}  # user id -> DM channel id
        self.closed_dms: set[int] = set()  # users who accept no direct messages from the bot
        self.messages: dict[int, list[dict[str, Any]]] = {cid: [] for cid in self.channel_data}
        self.reactions: dict[int, dict[str, set[int]]] = {}  # message id -> emoji -> user ids
        self.joined_at = now_iso()
        # The CDN: attachment id -> bytes; URLs signed with a secret of this world, on the wall clock
        # ``cdn_clock`` (a test moves it to expire every URL handed out so far).
        self.blobs: dict[int, Blob] = {}
        self.cdn_base = "https://cdn.discordapp.com"  # the emulator sets its own origin when it starts
        self.cdn_clock: Callable[[], float] = time.time
        self.cdn_url_lifetime = CDN_URL_LIFETIME_SECONDS
        self._cdn_secret = secrets.token_bytes(16)

    def snowflake(self) -> int:
        """A fresh id whose timestamp part is now, like Discord's."""
        ms = int(self.clock() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)

    def _add_user(
        self, key: str, username: str, *, bot: bool = False, roles: list[int] | None = None
    ) -> UserRecord:
        user = UserRecord(self.snowflake(), username, bot, list(roles or []))
        self.users[key] = user
        self._by_id[user.id] = user
        return user

    def add_member(
        self, key: str, username: str, *, admin: bool = False, roles: list[int] | tuple[int, ...] = ()
    ) -> int:
        """Add a member of every guild (visible to the bot on its next IDENTIFY); returns the user id.

        ``admin`` gives the first guild's Admin role; ``roles`` are role ids (``add_role``) of any guild.
        """
        return self._add_user(key, username, roles=[self.admin_role_id] * admin + list(roles)).id

    def add_guild(self, name: str, *, owner: str = "admin", shard: tuple[int, int] | None = None) -> int:
        """Add a guild (the bot joined it, every user is a member) with @everyone and the bot's role.

        ``shard=(shard_id, num_shards)`` picks an id on that shard: ``(id >> 22) % num_shards``
        (Gateway.md, "Sharding"), the timestamp part moved forward by less than ``num_shards`` ms.
        """
        gid = self.snowflake()
        if shard is not None:
            shard_id, count = shard
            ms, low = gid >> 22, gid & 0x3FFFFF
            gid = ((ms + (shard_id - ms) % count) << 22) | low
        bot_role = self.snowflake()
        self.guilds[gid] = GuildRecord(gid, name, owner, [
            RoleRecord(gid, "@everyone", EVERYONE_PERMISSIONS, 0),
            RoleRecord(bot_role, "Bot", BOT_PERMISSIONS, 1, managed=True),
        ])
        self.bot.role_ids.append(bot_role)
        return gid

    def add_role(self, name: str, permissions: int, *, guild_id: int | None = None) -> int:
        """Add a role to a guild (default: the first); give it with ``add_member(roles=[...])``."""
        guild = self.guilds[guild_id if guild_id is not None else self.guild_id]
        rid = self.snowflake()
        guild.roles.append(RoleRecord(rid, name, permissions, len(guild.roles)))
        return rid

    def set_team(self, name: str, members: dict[str, str], *, owner: str | None = None) -> int:
        """Give the application to a team: ``members`` maps user keys to a team role (``admin``,
        ``developer``, ``read_only``); a key ending in ``?`` is only invited, not yet a member.
        ``owner`` (default: the first key) owns the team. Returns the team id."""
        parsed: dict[str, tuple[str, int]] = {}
        for key, role in members.items():
            if role not in TEAM_ROLES:
                raise ValueError(f"unknown team role {role!r}; one of {sorted(TEAM_ROLES)}")
            state = TEAM_INVITED if key.endswith("?") else TEAM_ACCEPTED
            parsed[key.rstrip("?")] = (role, state)
        self.team = TeamRecord(self.snowflake(), name, owner or next(iter(parsed)), parsed)
        return self.team.id

    def add_text_channel(
        self,
        name: str,
        *,
        position: int | None = None,
        guild_id: int | None = None,
        category: int | None = None,
    ) -> int:
        """Add a text channel to a guild (default: the first), in ``category`` if given; returns its id."""
        return self._add_channel(name, CHANNEL_TEXT, position=position, guild_id=guild_id, category=category)

    def add_category(self, name: str, *, guild_id: int | None = None) -> int:
        """Add a category (a channel of type 4 that others name as their ``parent_id``); returns its id."""
        return self._add_channel(name, CHANNEL_CATEGORY, guild_id=guild_id)

    def add_forum_channel(
        self, name: str, *, guild_id: int | None = None, category: int | None = None
    ) -> int:
        """Add a forum (type 15): it holds no messages of its own, each post is a thread in it."""
        cid = self._add_channel(name, CHANNEL_FORUM, guild_id=guild_id, category=category)
        self.channel_data[cid].update({
            "available_tags": [],
            "default_reaction_emoji": None,
            "default_sort_order": None,
            "default_forum_layout": 0,
            "default_thread_rate_limit_per_user": 0,
        })
        return cid

    def _add_channel(
        self,
        name: str,
        kind: int,
        *,
        position: int | None = None,
        guild_id: int | None = None,
        category: int | None = None,
    ) -> int:
        cid = self.snowflake()
        self.channels[name] = cid
        self.channel_data[cid] = {
            "id": str(cid),
            "type": kind,
            "guild_id": str(guild_id if guild_id is not None else self.guild_id),
            "name": name,
            "position": len(self.channels) - 1 if position is None else position,
            "parent_id": None if category is None else str(category),
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }
        if hasattr(self, "messages"):
            self.messages[cid] = []
        return cid

    def add_thread(self, parent_id: int, name: str, *, owner: str | int, thread_id: int | None = None) -> int:
        """Add a public thread (type 11) in a text channel or forum; ``thread_id`` is the id of the
        message it starts from (a thread from a message, and a forum post, share their first
        message's id, as on Discord). Returns its id."""
        parent = self.channel_data[parent_id]
        if parent.get("type") not in THREAD_PARENTS:
            raise ValueError(f"channel {parent_id} cannot hold threads")
        tid = thread_id if thread_id is not None else self.snowflake()
        self.channel_data[tid] = {
            "id": str(tid),
            "type": CHANNEL_PUBLIC_THREAD,
            "guild_id": parent["guild_id"],
            "parent_id": str(parent_id),
            "owner_id": str(self.user(owner).id),
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now_iso(),
                "locked": False,
                "create_timestamp": now_iso(),
            },
        }
        self.messages[tid] = []
        return tid

    def user(self, who: str | int) -> UserRecord:
        """Look a user up by key (``"admin"``) or id."""
        if isinstance(who, str):
            return self.users[who]
        cached = self._by_id.get(who)
        if cached is not None and cached.id == who:  # ids may be reassigned (the bot's is)
            return cached
        for user in self.users.values():
            if user.id == who:
                self._by_id[who] = user
                return user
        raise KeyError(who)

    def dm_channel(self, who: str | int) -> int:
        """The DM channel id between the bot and a user, created on first use."""
        user = self.user(who)
        if user.id not in self.dm_channels:
            cid = self.snowflake()
            self.dm_channels[user.id] = cid
            self.channel_data[cid] = {
                "id": str(cid),
                "type": CHANNEL_DM,
                "last_message_id": None,
                "recipients": [user.payload()],
                "flags": 0,
            }
            self.messages[cid] = []
        return self.dm_channels[user.id]

    def close_dms(self, who: str | int) -> None:
        """The user accepts no DMs from the bot (privacy setting, or blocked it): the DM channel
        can still be opened, but the bot's messages there are refused (403, code 50007)."""
        self.closed_dms.add(self.user(who).id)

    def dm_recipient(self, channel_id: int) -> int | None:
        """The user of a DM channel; None for any other channel."""
        channel = self.channel_data.get(channel_id, {})
        if channel.get("type") != CHANNEL_DM:
            return None
        return int(channel["recipients"][0]["id"])

    def is_guild_channel(self, channel_id: int) -> bool:
        return "guild_id" in self.channel_data.get(channel_id, {})

    def channel_guild(self, channel_id: int) -> int | None:
        """The guild a channel or thread belongs to; None for a DM."""
        gid = self.channel_data.get(channel_id, {}).get("guild_id")
        return None if gid is None else int(gid)

    # --- permissions and members -------------------------------------------------------------

    def permissions(self, user: UserRecord, guild_id: int | None = None) -> int:
        """Guild-level permissions of a member (Administrator implies all); default: the first guild."""
        perms = 0
        for role in self.guilds[guild_id if guild_id is not None else self.guild_id].roles:
            if role.name == "@everyone" or role.id in user.role_ids:
                perms |= role.permissions
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def set_overwrite(self, channel_id: int, target_id: int, *, allow: int = 0, deny: int = 0) -> None:
        """Put a permission overwrite on a guild channel for a role (its id) or a member (a user
        id), replacing that target's earlier one; sent in GUILD_CREATE like Discord's."""
        channel = self.channel_data[channel_id]
        gid = self.channel_guild(channel_id)
        if gid is None or channel.get("type") == CHANNEL_PUBLIC_THREAD:
            raise ValueError("overwrites belong to guild channels (threads use their parent's)")
        kind = 0 if any(r.id == target_id for r in self.guilds[gid].roles) else 1  # 0 role, 1 member
        kept = [o for o in channel["permission_overwrites"] if o["id"] != str(target_id)]
        overwrite = {"id": str(target_id), "type": kind, "allow": str(allow), "deny": str(deny)}
        channel["permission_overwrites"] = [*kept, overwrite]

    def channel_permissions(self, user: UserRecord, channel_id: int) -> int:
        """A member's permissions in a guild channel or thread: the guild's, then the channel's
        overwrites in Discord's order (@everyone, the member's roles together, the member), as in
        discord-api-docs ``docs/topics/Permissions.md`` "Permission Overwrites". A thread uses its
        parent's overwrites."""
        gid = self.channel_guild(channel_id)
        if gid is None:
            raise ValueError(f"channel {channel_id} is not a guild channel")
        perms = self.permissions(user, gid)
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        channel = self.channel_data[channel_id]
        if channel.get("type") == CHANNEL_PUBLIC_THREAD:
            channel = self.channel_data[int(channel["parent_id"])]
        overwrites = {int(o["id"]): o for o in channel.get("permission_overwrites") or []}
        everyone = overwrites.get(gid)
        if everyone is not None:
            perms = (perms & ~int(everyone["deny"])) | int(everyone["allow"])
        allow = deny = 0
        for role_id in user.role_ids:
            o = overwrites.get(role_id)
            if o is not None and o["type"] == 0:
                allow, deny = allow | int(o["allow"]), deny | int(o["deny"])
        perms = (perms & ~deny) | allow
        member = overwrites.get(user.id)
        if member is not None and member["type"] == 1:
            perms = (perms & ~int(member["deny"])) | int(member["allow"])
        return perms

    def roles(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        return [r.payload() for r in self.guilds[guild_id if guild_id is not None else self.guild_id].roles]

    def member_payload(
        self, user: UserRecord, *, with_user: bool = True, guild_id: int | None = None
    ) -> dict[str, Any]:
        guild = self.guilds[guild_id if guild_id is not None else self.guild_id]
        own = {r.id for r in guild.roles if r.name != "@everyone"}
        data: dict[str, Any] = {
            "roles": [str(r) for r in user.role_ids if r in own],
            "joined_at": self.joined_at,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
        }
        if with_user:
            data["user"] = user.payload()
        return data

    # --- gateway payloads ----------------------------------------------------------------------

    def ready_payload(
        self, session_id: str, resume_url: str, *, guilds: list[int] | None = None
    ) -> dict[str, Any]:
        """READY, listing ``guilds`` (default: all) as unavailable until their GUILD_CREATE."""
        me = self.bot.payload() | {"verified": True, "mfa_enabled": False, "flags": 0}
        return {
            "v": 10,
            "user": me,
            "guilds": [
                {"id": str(gid), "unavailable": True} for gid in (self.guilds if guilds is None else guilds)
            ],
            "session_id": session_id,
            "resume_gateway_url": resume_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "session_type": "normal",
        }

    def guild_create_payload(self, intents: int, guild_id: int | None = None) -> dict[str, Any]:
        guild = self.guilds[guild_id if guild_id is not None else self.guild_id]
        members = list(self.users.values())
        if not intents & INTENT_GUILD_MEMBERS:
            members = [self.bot]  # without the members intent Discord sends only the bot itself
        own = [c for c in self.channel_data.values() if c.get("guild_id") == str(guild.id)]
        channels = [c for c in own if c.get("type") in (CHANNEL_TEXT, CHANNEL_CATEGORY, CHANNEL_FORUM)]
        threads = [c for c in own if c.get("type") == CHANNEL_PUBLIC_THREAD]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "owner_id": str(self.users[guild.owner].id),
            "unavailable": False,
            "large": False,
            "member_count": len(self.users),
            "joined_at": self.joined_at,
            "roles": [r.payload() for r in guild.roles],
            "channels": channels,
            "threads": threads,
            "members": [self.member_payload(u, guild_id=guild.id) for u in members],
            "presences": [],
            "voice_states": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "system_channel_flags": 0,
        }

    def application_payload(self) -> dict[str, Any]:
        """``GET /oauth2/applications/@me``: a team-owned application's ``owner`` is a stand-in
        user for the team (its id is the team's), and ``team`` lists the members with their roles."""
        owner = self.users[self.application_owner].payload()
        team = None
        if self.team is not None:
            owner = {
                "id": str(self.team.id), "username": f"team{self.team.id}", "global_name": None,
                "discriminator": "0", "avatar": None, "flags": 1024, "public_flags": 1024,
            }
            team = {
                "id": str(self.team.id),
                "name": self.team.name,
                "icon": None,
                "owner_user_id": str(self.users[self.team.owner].id),
                "members": [
                    {
                        "membership_state": state,
                        "team_id": str(self.team.id),
                        "user": self.users[key].payload(),
                        "role": role,
                        "permissions": ["*"],
                    }
                    for key, (role, state) in self.team.members.items()
                ],
            }
        return {
            "id": str(self.application_id),
            "name": self.bot.username,
            "description": "Sandbox application",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": owner,
            "verify_key": "0" * 64,
            "flags": 0,
            "team": team,
            "summary": "",
            "bot": self.bot.payload(),
        }

    # --- messages ------------------------------------------------------------------------------

    def message_payload(
        self,
        channel_id: int,
        author: UserRecord,
        content: str,
        *,
        embeds: list[dict[str, Any]] | None = None,
        mentions: list[UserRecord] | None = None,
        reference_message_id: int | None = None,
        attachments: list[dict[str, Any]] | None = None,
        flags: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Build a message payload; the caller stores it with :meth:`store`."""
        guild_id = self.channel_guild(channel_id)
        guild = guild_id is not None
        mid = self.snowflake()
        data: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "author": author.payload(),
            "content": content,
            "timestamp": datetime.fromtimestamp(self.clock(), UTC).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [self._attachment(a, channel_id) for a in attachments or []],
            "embeds": list(embeds or []),
            "pinned": False,
            "type": MESSAGE_DEFAULT,
            "flags": flags,
            "components": [],
        }
        for user in mentions or []:
            mentioned = user.payload()
            if guild:
                mentioned["member"] = self.member_payload(user, with_user=False, guild_id=guild_id)
            data["mentions"].append(mentioned)
        if guild:
            data["guild_id"] = str(guild_id)
            data["member"] = self.member_payload(author, with_user=False, guild_id=guild_id)
        if reference_message_id is not None:
            data["type"] = MESSAGE_REPLY
            data["message_reference"] = {
                "type": 0,
                "message_id": str(reference_message_id),
                "channel_id": str(channel_id),
            }
            if guild:
                data["message_reference"]["guild_id"] = str(guild_id)
            data["referenced_message"] = self.find_message(channel_id, reference_message_id)
        if extra:
            data.update(extra)
        return data

    def _attachment(self, spec: dict[str, Any], channel_id: int) -> dict[str, Any]:
        """An attachment object; with ``data`` (bytes) it is on the CDN, behind a signed URL.

        ``voice=True`` makes it a voice message's recording (``duration_secs``, ``waveform``).
        """
        aid = self.snowflake()
        filename = spec.get("filename", "file.txt")
        content_type = spec.get("content_type", "text/plain")
        data = spec.get("data")
        if data is not None:
            self.blobs[aid] = Blob(bytes(data), content_type, filename, channel_id)
            url = self.signed_url(channel_id, aid, filename)
        else:
            url = spec.get("url", f"https://cdn.discordapp.com/attachments/0/{aid}/{filename}")
        attachment: dict[str, Any] = {
            "id": str(aid),
            "filename": filename,
            "size": int(spec.get("size", len(data) if data is not None else 0)),
            "url": url,
            "proxy_url": spec.get("proxy_url", url),
            "content_type": content_type,
        }
        if spec.get("voice"):
            attachment["duration_secs"] = float(spec.get("duration", 3.5))
            attachment["waveform"] = base64.b64encode(bytes(range(0, 256, 4))).decode()
            attachment["flags"] = 0
        return attachment

    # --- the CDN -----------------------------------------------------------------------------------

    def _signature(self, path: str, ex: str, issued: str) -> str:
        return hmac.new(self._cdn_secret, f"{path}|{ex}|{issued}".encode(), hashlib.sha256).hexdigest()

    def signed_url(self, channel_id: int, attachment_id: int, filename: str) -> str:
        """A fresh signed CDN URL for an attachment, valid ``cdn_url_lifetime`` seconds from now."""
        path = f"/attachments/{channel_id}/{attachment_id}/{filename}"
        now = self.cdn_clock()
        ex, issued = f"{int(now + self.cdn_url_lifetime):x}", f"{int(now):x}"
        return f"{self.cdn_base}{path}?ex={ex}&is={issued}&hm={self._signature(path, ex, issued)}&"

    def cdn_blob(self, path: str, query: dict[str, str]) -> Blob | None:
        """The blob a CDN request may have: a valid, unexpired signature on an existing attachment."""
        ex, issued, hm = query.get("ex", ""), query.get("is", ""), query.get("hm", "")
        if not hmac.compare_digest(hm, self._signature(path, ex, issued)):
            return None
        try:
            if int(ex, 16) <= self.cdn_clock():
                return None
            attachment_id = int(path.split("/")[3])
        except (ValueError, IndexError):
            return None
        return self.blobs.get(attachment_id)

    def media_proxy_url(self, data: bytes, content_type: str, filename: str) -> str:
        """Put an image on the media proxy (as Discord does for an embed's image: ``proxy_url``,
        unsigned); returns its URL."""
        key = self.snowflake()
        self.blobs[key] = Blob(bytes(data), content_type, filename, 0)
        return f"{self.cdn_base}/external/{key}/{filename}"

    def refreshed(self, message: dict[str, Any]) -> dict[str, Any]:
        """``message`` as the API returns it when it is read: its attachments with fresh signed URLs
        (Discord "will automatically return valid, non-expired URLs when you access resources that
        contain an attachment CDN URL, like when retrieving a message")."""
        attachments = message.get("attachments") or []
        if not any(int(a["id"]) in self.blobs for a in attachments):
            return message
        fresh = []
        for a in attachments:
            aid = int(a["id"])
            if aid in self.blobs:
                url = self.signed_url(int(message["channel_id"]), aid, a["filename"])
                a = {**a, "url": url, "proxy_url": url}
            fresh.append(a)
        return {**message, "attachments": fresh}

    def store(self, data: dict[str, Any]) -> None:
        """Append a message to its channel's history."""
        cid = int(data["channel_id"])
        self.messages.setdefault(cid, []).append(data)
        channel = self.channel_data.get(cid)
        if channel is not None:
            channel["last_message_id"] = data["id"]

    def find_message(self, channel_id: int, message_id: int) -> dict[str, Any] | None:
        for message in self.messages.get(channel_id, []):
            if int(message["id"]) == message_id:
                return message
        return None

    def delete_message(self, channel_id: int, message_id: int) -> bool:
        history = self.messages.get(channel_id, [])
        for index, message in enumerate(history):
            if int(message["id"]) == message_id:
                del history[index]
                self.reactions.pop(message_id, None)
                for attachment in message.get("attachments") or []:
                    self.blobs.pop(int(attachment["id"]), None)  # a deleted message's files leave the CDN
                return True
        return False

    def history(
        self, channel_id: int, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> list[dict[str, Any]]:
        """Messages newest first, like ``GET /channels/{id}/messages``."""
        found = [
            m
            for m in self.messages.get(channel_id, [])
            if (before is None or int(m["id"]) < before) and (after is None or int(m["id"]) > after)
        ]
        if after is not None and before is None:
            found = found[:limit]  # the oldest ones just after ``after``
            return list(reversed(found))
        return list(reversed(found))[:limit]


# --- rate limits -----------------------------------------------------------------------------------
#
# Modelled on https://discord.com/developers/docs/topics/rate-limits: every REST response carries
# X-RateLimit-Limit (requests per window), -Remaining, -Reset (epoch seconds), -Reset-After
# (seconds) and -Bucket (one hash per route, "non-inclusive of top-level resources": each channel,
# guild or webhook in the path has its own count under the same hash). Exceeding a bucket is 429
# with a JSON body {"message", "retry_after" (seconds, float), "global": false}, Retry-After and
# X-RateLimit-Scope: user; the global limit (50 requests a second for a bot) answers 429 with
# "global": true, X-RateLimit-Global: true and X-RateLimit-Scope: global.


@dataclass(frozen=True, slots=True)
class Limit:
    """A bucket's rule: at most ``limit`` requests in a window of ``per`` seconds."""

    limit: int
    per: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.per <= 0:
            raise ValueError("a rate limit needs limit >= 1 and per > 0")


DEFAULT_LIMIT = Limit(50, 1.0)
"""Every route's bucket unless set otherwise: as many a second as Discord's global limit allows
(generous: a scenario sets a route's real limit with ``RateLimits.set``)."""


@dataclass(frozen=True, slots=True)
class RateVerdict:
    """What the rate limits say about one request: served (``retry_after`` 0) or 429.

    ``headers`` go on the response either way; ``scope`` is ``"user"`` (a route's bucket) or
    ``"global"`` when limited.
    """

    headers: dict[str, str]
    retry_after: float = 0.0
    scope: str | None = None

    @property
    def limited(self) -> bool:
        return self.scope is not None


@dataclass(slots=True)
class _Window:
    start: float
    used: int = 0


class RateLimits:
    """Discord's REST rate limits: a fixed-window bucket per route and top-level resource, and an
    optional global limit, on an injected monotonic ``clock`` (``wall`` stamps X-RateLimit-Reset).

    ``set(route, limit, per, channel_id=None)`` gives a route a rule for every channel (every
    top-level resource: guild, webhook) or for one channel; ``set_global(limit, per)`` turns the
    global limit on (``None`` turns it off). ``hit(route, resource)`` counts one request and
    returns its verdict (``resource``: the id of the channel, guild or webhook in its path).
    """

    PRUNE_FLOOR = 1024

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall: Callable[[], float] = time.time,
        default: Limit = DEFAULT_LIMIT,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self.default = default
        self._routes: dict[str, Limit] = {}
        self._resources: dict[tuple[str, str], Limit] = {}
        self._global: Limit | None = None
        self._global_window: _Window | None = None
        self._windows: dict[tuple[str, str], _Window] = {}
        self._next_prune = self.PRUNE_FLOOR

    def set(self, route: str, limit: int, per: float, *, channel_id: int | str | None = None) -> None:
        """Give ``route`` (an emulator route name, e.g. ``"send"``) ``limit`` requests per ``per``
        seconds, everywhere or only in ``channel_id``; a running window keeps its count."""
        rule = Limit(limit, per)
        if channel_id is None:
            self._routes[route] = rule
        else:
            self._resources[(route, str(channel_id))] = rule

    def set_global(self, limit: int | None, per: float = 1.0) -> None:
        """Turn the global limit on (``limit`` requests per ``per`` seconds, any route) or off (None)."""
        self._global = None if limit is None else Limit(limit, per)
        self._global_window = None

    def clear(self) -> None:
        """Back to the default rule everywhere, no global limit, every window forgotten."""
        self._routes.clear()
        self._resources.clear()
        self._windows.clear()
        self._global = self._global_window = None

    def rule(self, route: str, resource: str) -> Limit:
        return self._resources.get((route, resource)) or self._routes.get(route) or self.default

    @staticmethod
    @functools.cache
    def bucket_hash(route: str) -> str:
        """The route's X-RateLimit-Bucket: opaque, stable, the same for every resource."""
        return hashlib.sha1(f"emulated-bucket:{route}".encode()).hexdigest()[:16]

    def hit(self, route: str, resource: str = "") -> RateVerdict:
        """Count a request to ``route`` on ``resource``; its headers, and whether it is limited."""
        now = self._clock()
        if self._global is not None:
            window = self._global_window
            if window is None or now >= window.start + self._global.per:
                window = self._global_window = _Window(now)
            if window.used >= self._global.limit:
                retry_after = window.start + self._global.per - now
                headers = {
                    "Retry-After": str(math.ceil(retry_after)),
                    "X-RateLimit-Global": "true",
                    "X-RateLimit-Scope": "global",
                }
                return RateVerdict(headers, retry_after, "global")
            window.used += 1
        rule = self.rule(route, resource)
        key = (route, resource)
        window = self._windows.get(key)
        if window is None or now >= window.start + rule.per:
            window = self._windows[key] = _Window(now)
            self._prune(now)
        reset_after = window.start + rule.per - now
        limited = window.used >= rule.limit
        if not limited:
            window.used += 1
        headers = {
            "X-RateLimit-Limit": str(rule.limit),
            "X-RateLimit-Remaining": str(rule.limit - window.used),
            "X-RateLimit-Reset": f"{self._wall() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": self.bucket_hash(route),
        }
        if not limited:
            return RateVerdict(headers)
        headers["Retry-After"] = str(math.ceil(reset_after))
        headers["X-RateLimit-Scope"] = "user"
        return RateVerdict(headers, reset_after, "user")

    def _prune(self, now: float) -> None:
        """Forget ended windows once the map has doubled (bounded memory, O(1) amortized)."""
        if len(self._windows) < self._next_prune:
            return
        for key in [k for k, w in self._windows.items() if now >= w.start + self.rule(*k).per]:
            del self._windows[key]
        self._next_prune = max(self.PRUNE_FLOOR, 2 * len(self._windows))
