"""A batch's tasks: its items, chat turns that hand their slot on as they end, and the
webhook that tells its `callback_url` the batch has ended."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from agent_orchestrator.clients.webhooks import CallbackRefused, WebhooksDisabled, WebhookSender
from agent_orchestrator.db.repositories.batches import BATCH_ITEM_KIND
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.observability.metrics import WEBHOOK_ATTEMPTS
from agent_orchestrator.queue.consumer import TaskContext
from agent_orchestrator.queue.registry import HandlerRegistry, SessionOnClaim, TaskFailure
from agent_orchestrator.queue.tasks.chat_tasks import ChatTurn
from agent_orchestrator.services.batches import CALLBACK_KIND, BatchManager

#: Answers after which the same POST may succeed later.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


def register_batch_kinds(
    registry: HandlerRegistry, turn: ChatTurn, batches: BatchManager, sender: WebhookSender
) -> None:
    async def item_settled(task: TaskRow) -> None:
        try:
            await turn.settled(task)  # the item's session is free again
        finally:  # and, whatever that did, its slot goes to the batch's next item
            await batches.item_settled(task)

    registry.register(
        BATCH_ITEM_KIND,
        turn.run,
        on_settled=item_settled,
        on_claimed=SessionOnClaim(move=turn.processing, moved=turn.claimed),
    )
    turn.kinds.add(BATCH_ITEM_KIND)
    registry.register(CALLBACK_KIND, CallbackDelivery(batches, sender).run)


class CallbackDelivery:
    """POSTs the ended batch to its `callback_url`. A failure the receiver may get over
    (no connection, a timeout, 5xx, 408, 425, 429) is retried with the task engine's
    backoff up to WEBHOOK_MAX_ATTEMPTS; any other answer, or an address callbacks may
    not reach, fails the task at once. Every attempt carries the same `webhook-id`."""

    def __init__(self, batches: BatchManager, sender: WebhookSender) -> None:
        self.batches = batches
        self.sender = sender

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        task = ctx.task
        payload = await self.batches.callback_payload(
            task.tenant_id, uuid.UUID(task.input["batch_id"])
        )
        if payload is None:
            raise TaskFailure("not_found", "the batch no longer exists")
        try:
            answer = await self.sender.send(task.input["url"], str(task.id), payload)
        except CallbackRefused as error:
            WEBHOOK_ATTEMPTS.labels("refused").inc()
            raise TaskFailure("callback_refused", str(error)) from error
        except WebhooksDisabled as error:  # another worker, configured, may take it
            WEBHOOK_ATTEMPTS.labels("retried").inc()
            raise TaskFailure("webhooks_disabled", str(error), retryable=True) from error
        except (aiohttp.ClientError, TimeoutError) as error:
            WEBHOOK_ATTEMPTS.labels("retried").inc()
            reason = str(error) or type(error).__name__
            raise TaskFailure(
                "callback_unreachable",
                f"the callback URL could not be reached: {reason}",
                retryable=True,
            ) from error
        if 200 <= answer.status < 300:
            WEBHOOK_ATTEMPTS.labels("accepted").inc()
            return {"status_code": answer.status}
        retryable = answer.status >= 500 or answer.status in RETRYABLE_STATUSES
        WEBHOOK_ATTEMPTS.labels("retried" if retryable else "rejected").inc()
        raise TaskFailure(
            "callback_rejected", f"the callback URL answered {answer.status}", retryable=retryable
        )
