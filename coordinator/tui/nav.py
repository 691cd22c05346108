"""Where the operator is in `lab dash`: the current screen, the history behind it, and the
`:` command language. Pure: the urwid layer calls these and draws the result."""

from __future__ import annotations

import dataclasses

from lab.coordinator.tui.models import KIND_OF_VIEW, SERVERS, VIEW_OF_KIND, VIEWS, Target

HISTORY_LIMIT = 100

# `:` aliases, k9s style (any unique prefix of a view name works too)
VIEW_ALIASES = {
    "srv": SERVERS,
    "server": SERVERS,
    "sv": SERVERS,
    "label": "labels",
    "lb": "labels",
    "group": "groups",
    "grp": "groups",
    "alert": "alerts",
    "al": "alerts",
    "secret": "secrets",
    "sec": "secrets",
}
QUIT = ("q", "q!", "quit", "exit")
ACTIONS = ("sync", "plan", "apply", "renew")
ACTION_NOTES = {  # what the y/N question adds, so nobody applies or renews by surprise
    "apply": "applies the plan stored by `lab plan server {name}`",
    "renew": "a new certificate; the agent takes it at its next check-in",
}


def confirm_question(action: str, words: str, name: str) -> str:
    """The text of the y/N dialog before an action."""
    note = ACTION_NOTES.get(action)
    extra = f"\n ({note.format(name=name)})" if note else ""
    return f" Run {words} on {name}?{extra}\n\n [y] yes    [N] no "


@dataclasses.dataclass(frozen=True, slots=True)
class Screen:
    """One place in the dashboard: a list view, or the detail of one thing."""

    view: str
    target: Target | None = None
    filter: str = ""
    focus: str | None = None  # key of the focused row/line, restored when coming back
    pane: int = 0

    @property
    def key(self) -> tuple[str, ...]:
        """What data the screen needs (cache and request key)."""
        if self.target is None:
            return ("list", self.view)
        return ("detail", self.target.kind, self.target.name)

    @property
    def is_list(self) -> bool:
        return self.target is None

    @property
    def crumb(self) -> str:
        return self.view.capitalize() if self.target is None else self.target.name


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A parsed `:` command: kind is view, target, action, quit, help or error."""

    kind: str
    view: str = ""
    target: Target | None = None
    message: str = ""


def resolve_view(word: str) -> str | None:
    word = word.lower()
    if word in VIEWS:
        return word
    if word in VIEW_ALIASES:
        return VIEW_ALIASES[word]
    hits = [v for v in VIEWS if v.startswith(word)]
    return hits[0] if len(hits) == 1 else None


def parse_command(text: str) -> Command:
    """`:servers`, `:lb`, `:server worker-5`, `:label k8s-worker`, `:q`, `:help`, `:sync`."""
    words = text.strip().lstrip(":").split()
    if not words:
        return Command("error", message="empty command")
    head, rest = words[0].lower(), words[1:]
    if head in QUIT:
        return Command("quit")
    if head in ("help", "h", "?"):
        return Command("help")
    if head in ACTIONS and not rest:
        return Command("action", view=head)
    view = resolve_view(head)
    if view is None:
        return Command("error", message=f"unknown view '{head}' (try: {', '.join(VIEWS)})")
    if not rest:
        return Command("view", view=view)
    if len(rest) > 1:
        return Command("error", message=f"one name at a time: :{head} NAME")
    return Command("target", view=view, target=Target(KIND_OF_VIEW[view], rest[0]))


class Navigator:
    """The screen shown now and the history stack behind it.

    * ``drill(target)`` pushes the current screen and opens the target's detail;
    * ``back()`` clears an active filter first, else pops the history (False at the bottom);
    * ``jump(view)`` opens a list view, keeping the way back;
    * ``set_filter``/``remember`` change the current screen in place."""

    def __init__(self, start: Screen | None = None) -> None:
        self.current = start or Screen(SERVERS)
        self.history: list[Screen] = []

    def _push(self, screen: Screen) -> Screen:
        self.history.append(self.current)
        del self.history[:-HISTORY_LIMIT]
        self.current = screen
        return screen

    def drill(self, target: Target) -> Screen:
        if target.kind not in VIEW_OF_KIND:
            raise ValueError(f"cannot open a {target.kind}")
        if self.current.target == target:
            return self.current
        return self._push(Screen(VIEW_OF_KIND[target.kind], target))

    def jump(self, view: str) -> Screen:
        if view not in VIEWS:
            raise ValueError(f"no view named {view!r}")
        if self.current.is_list and self.current.view == view:
            self.current = dataclasses.replace(self.current, filter="")
            return self.current
        return self._push(Screen(view))

    def back(self) -> bool:
        if self.current.filter:
            self.current = dataclasses.replace(self.current, filter="")
            return True
        if not self.history:
            return False
        self.current = self.history.pop()
        return True

    def set_filter(self, query: str) -> Screen:
        self.current = dataclasses.replace(self.current, filter=query.strip())
        return self.current

    def remember(self, focus: str | None = None, pane: int | None = None) -> None:
        changes: dict[str, object] = {}
        if focus is not None:
            changes["focus"] = focus
        if pane is not None:
            changes["pane"] = pane
        if changes:
            self.current = dataclasses.replace(self.current, **changes)

    def breadcrumbs(self, keep: int = 4) -> str:
        """`Servers > worker-5 > k8s-worker`: from the newest list screen, the last ``keep`` steps."""
        trail = [*self.history, self.current]
        start = max((i for i, s in enumerate(trail) if s.is_list), default=0)
        crumbs = [s.crumb for s in trail[start:]]
        if len(crumbs) > keep:
            crumbs = [crumbs[0], "…", *crumbs[-(keep - 2):]]
        return " > ".join(crumbs)
