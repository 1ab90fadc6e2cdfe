"""A task's transition and its session's, as one statement on PostgreSQL.

Both the claim of a chat turn (the task `running`, its session `processing`) and its end
(turn_end.py) move a task and its session together. On PostgreSQL that is one statement,
sent in autocommit: the task's guarded UPDATE is a CTE, and the session's UPDATE applies
only when the task's did and the session is that task's:

    WITH t AS (UPDATE tasks ... RETURNING tasks.*),
         s AS (UPDATE sessions ... AND EXISTS (SELECT FROM t WHERE t.session_id =
               sessions.id) RETURNING sessions.*)
    SELECT t.*, s.* FROM t LEFT JOIN s ON true

One round trip instead of two (or four with BEGIN and COMMIT). The statements are the
repositories' own (same guards, same values), the session's parameters renamed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    Update,
    bindparam,
    exists,
    literal,
    select,
    true,
)
from sqlalchemy.sql import visitors

from agent_orchestrator.db.driver_session import DriverSession
from agent_orchestrator.db.prepared import Bound, hot
from agent_orchestrator.db.repositories.sessions import SESSIONS
from agent_orchestrator.db.repositories.tasks import TASKS
from agent_orchestrator.db.tables import SessionRow, TaskRow

#: Parameters of the session's statement are renamed with this prefix; its returned
#: columns are labelled with the other (the task's columns keep their names).
_SESSION_PREFIX = "s_"
_SESSION_COLUMN = "session__"


def joint_statement(task: Update, session: Update) -> tuple[Select[Any], ColumnElement[bool]]:
    """The statement above, and `EXISTS (SELECT FROM t)` for callers that add more parts
    which must write only when the task's transition applied."""
    t = task.cte("t")
    applied = exists(select(literal(1)).select_from(t))
    own = exists(select(literal(1)).select_from(t).where(t.c.session_id == SESSIONS.columns.id))
    s = _renamed(session, _SESSION_PREFIX).where(own).cte("s")
    columns: list[ColumnElement[Any]] = [*t.c]
    columns += [column.label(_SESSION_COLUMN + column.key) for column in s.c]
    return select(*columns).select_from(t.outerjoin(s, true())), applied


def joint_params(task: Bound, session: Bound) -> dict[str, Any]:
    params = dict(task[1])
    params.update({_SESSION_PREFIX + name: value for name, value in session[1].items()})
    return params


def joint_rows(found: Mapping[str, Any]) -> tuple[TaskRow, SessionRow | None]:
    """The task's row and the session's (None when the session did not move)."""
    session = None
    if found[_SESSION_COLUMN + "id"] is not None:
        cut = len(_SESSION_COLUMN)
        session = SESSIONS.build(
            {k[cut:]: v for k, v in found.items() if k.startswith(_SESSION_COLUMN)}
        )
    return TASKS.build(found), session


async def move_together(
    db: DriverSession, task: Bound, session: Bound
) -> tuple[TaskRow | None, SessionRow | None]:
    """Send and commit the two transitions as one statement: (None, None) when the task's
    did not apply, and nothing was written."""
    statement = _together(_update(task), _update(session))
    result = await db.execute_last(statement, joint_params(task, session))
    await db.commit()
    found = result.one_or_none()
    return (None, None) if found is None else joint_rows(found)


@functools.cache
def _together(task: Update, session: Update) -> Select[Any]:
    # Keyed by the two statements, which their repositories build once per shape.
    return hot(joint_statement(task, session)[0])


def _update(bound: Bound) -> Update:
    statement = bound[0]
    assert isinstance(statement, Update)
    return statement


def _renamed(statement: Update, prefix: str) -> Update:
    """The statement with each of its parameters renamed `prefix + name`: two
    repositories' statements name theirs alike (w_id, v_state ...)."""

    def rename(element: Any, **_: Any) -> Any:
        # Unique parameters (literals, fixed_in's values) carry their value and get a
        # name of their own when compiled: they are left as they are.
        if isinstance(element, BindParameter) and not element.unique:
            return bindparam(
                prefix + element.key,
                element.value,
                type_=element.type,
                required=element.required,
            )
        return None

    renamed = visitors.replacement_traverse(statement, {}, rename)
    assert isinstance(renamed, Update)
    return renamed
