"""A Flower strategy that audits label leakage in every client update, and changes nothing.

``LeakageAuditStrategy`` wraps any strategy of Flower's Message API
(``flwr.serverapp.strategy``: FedAvg, FedProx, FedAdam, ...). Every round it
notes the weights each client was sent (``configure_train``), turns each reply
into that client's FedAvg update under the protocol the server set (E local
epochs of mini-batches of B at lr: ``attacks.local_update.LocalTraining``),
runs the chosen attacks on it (``integrations.audit.LeakageAudit``), records
what they restored, and hands the replies on, as they came, to the wrapped
strategy: the global model is bit for bit the wrapped strategy's.

The client's sample count K is the reply's weighting metric (``num-examples``),
which FedAvg already needs. With ``score_labels`` the clients of a simulation
may report their true label counts as the metric ``label-counts``; the audit
reads it only to score the attacks (LeAcc, LnAcc, IRec, Exact), never hands
it to them, and without the flag never reads it.

A reply the audit cannot attack (an error reply, a missing weight record,
wrong shapes, non-finite weights, no sample count) is recorded in one line of
the audit log with the reason; what the wrapped strategy does with it is its
own business (Flower's FedAvg leaves out error replies and refuses replies
whose records disagree).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from attacks.local_update import LocalTraining
from datamodules.composition import keyed_generator
from integrations.audit import LeakageAudit, loaded, shared_from_update
from integrations.audit_log import AuditLog
from user_errors import UserError

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # the core package does not need Flower
    raise UserError(
        f"the Flower integration needs flwr ({err}); install it with: pip install -e '.[flower]'"
    ) from None

log = logging.getLogger("audit")

#: the reply metric a simulation's client may send its true label counts in (scoring only)
LABEL_COUNTS_KEY = "label-counts"


def reply_metric(reply: Message, key: str):
    """The value of metric ``key`` in any of a reply's MetricRecords, or None."""
    for record in reply.content.metric_records.values():
        if key in record:
            return record[key]
    return None


class SkippedReply(Exception):
    """A reply the audit cannot attack; the message is the reason, one line."""


class LeakageAuditStrategy(Strategy):
    """Wraps ``strategy``; audits each client's update with ``attacks`` on ``model``'s structure.

    ``model`` is the network the federation trains (its weights are replaced by
    the ones sent each round; it is not changed). ``training`` is the local
    protocol the clients follow. ``auxiliary`` is the server's own labelled data
    for RLU, LLBG and RLU+. ``log_dir`` receives ``audit.json`` (after every
    round), TensorBoard scalars and ``leakage.png``. ``client_key`` names a reply
    metric that identifies the client in the log (read for the log only).

    With ``background`` (the default) each round is audited in a thread of its
    own while the next round trains: the audit adds to the federation's wall
    time only what the CPUs cannot overlap. ``start`` waits for the last round's
    audit; a caller that drives the rounds itself calls ``finish``.
    """

    def __init__(
        self,
        strategy: Strategy,
        model: nn.Module,
        training: LocalTraining,
        attacks: Iterable[str] = ("iLRG",),
        *,
        auxiliary=None,
        layer_name: str | None = None,
        score_labels: bool = False,
        log_dir=None,
        describe: dict | None = None,
        arrayrecord_key: str = "arrays",
        num_examples_key: str = "num-examples",
        client_key: str | None = None,
        seed: int = 0,
        attack_options: dict | None = None,
        background: bool = True,
    ):
        if not isinstance(strategy, Strategy):
            raise UserError(
                f"LeakageAuditStrategy wraps a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}"
            )
        self.strategy = strategy
        self.model = model
        self.training = training
        self.layer_name = layer_name
        self.audit = LeakageAudit(
            attacks, auxiliary=auxiliary, layer_name=layer_name, seed=seed, **(attack_options or {})
        )
        self.score_labels = score_labels
        self.arrayrecord_key = arrayrecord_key
        self.num_examples_key = num_examples_key
        self.client_key = client_key
        self.seed = seed
        description = {
            "attacks": list(self.audit.attacks),
            "local_training": training.describe(),
            "score_labels": score_labels,
            "strategy": type(strategy).__name__,
        }
        self.log = AuditLog(log_dir, {**description, **(describe or {})})
        # What each client of the current round was sent: node id -> ArrayRecord.
        self._sent: dict[int, ArrayRecord] = {}
        # One thread audits the rounds in order while the federation goes on (``background``).
        self._worker = ThreadPoolExecutor(1, "leakage-audit") if background else None
        self._pending: list[Future] = []

    # --- the rounds ----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {}
        for message in messages:
            record = message.content.get(self.arrayrecord_key)
            if isinstance(record, ArrayRecord):
                self._sent[message.metadata.dst_node_id] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._worker is None:
            self.audit_round(server_round, replies, self._sent)
        else:
            # The audit only reads the replies; the federation goes on while it runs.
            self._pending.append(
                self._worker.submit(self.audit_round, server_round, replies, self._sent)
            )
        return self.strategy.aggregate_train(server_round, replies)

    def audit_round(self, server_round: int, replies: list[Message], sent: dict) -> dict:
        """Audit every reply of a round and add the round to the log."""
        started = time.perf_counter()
        # One model per distinct sent record (FedAvg sends all clients the same): loaded once,
        # and the auxiliary attacks' statistics of it, which depend on the weights alone,
        # computed once for the round instead of once per client.
        models: dict[int, nn.Module] = {}
        clients = [self.audit_reply(server_round, reply, sent, models) for reply in replies]
        try:
            return self.log.add_round(server_round, clients, time.perf_counter() - started)
        except OSError as err:  # a full disk must not stop the federation
            log.error("round %d: the audit log could not be written: %s", server_round, err)
            return {}

    def finish(self) -> None:
        """Wait for the audits still running, then draw the plot and close the log."""
        pending, self._pending = self._pending, []
        for job in pending:
            job.result()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self.log.close()

    def audit_reply(
        self, server_round: int, reply: Message, sent: dict | None = None, models=None
    ) -> dict:
        """One reply's log entry: its restorations (and scores), or why it was skipped.

        Nothing here raises for a bad reply: a federation never stops for its audit.
        """
        node = reply.metadata.src_node_id
        entry: dict = {"node": node}
        try:
            name = self._client_name(reply)
            entry.update(name)
            sent = self._sent if sent is None else sent
            shared, truth = self._shared(reply, node, sent, {} if models is None else models)
            # From (seed, round, client) alone, so the log does not depend on the order the
            # replies arrived in; by the client's name where it has one (node ids change).
            generator = keyed_generator(self.seed, server_round, int(name.get("client", node)))
            result = self.audit(shared, true_counts=truth, generator=generator)
        except (SkippedReply, UserError) as reason:
            entry.update(status="skipped", reason=str(reason))
            log.warning("round %d, node %d: not audited: %s", server_round, node, reason)
            return entry
        except Exception as err:  # noqa: BLE001 - an attack's failure must not stop the federation
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            entry.update(status="failed", reason=reason)
            log.warning("round %d, node %d: audit failed: %s", server_round, node, reason)
            return entry
        entry.update(status="audited", **result.record())
        return entry

    def _client_name(self, reply: Message) -> dict:
        if self.client_key is None or reply.has_error():
            return {}
        name = reply_metric(reply, self.client_key)
        return {} if name is None else {"client": name}

    def _shared(self, reply: Message, node: int, sent: dict, models: dict):
        if reply.has_error():
            raise SkippedReply(f"the client failed: {reply.error.reason}")
        if node not in sent:
            raise SkippedReply("the reply comes from a node that was not sent weights this round")
        returned = reply.content.get(self.arrayrecord_key)
        if not isinstance(returned, ArrayRecord):
            raise SkippedReply(f"the reply holds no ArrayRecord {self.arrayrecord_key!r}")
        metrics = reply_metric(reply, self.num_examples_key)
        if (
            isinstance(metrics, bool)
            or not isinstance(metrics, (int, float))
            or not math.isfinite(metrics)
            or metrics != int(metrics)
            or metrics < 1
        ):
            raise SkippedReply(f"{self.num_examples_key!r} is {metrics!r}, not a sample count >= 1")
        num_images = int(metrics)
        record = sent[node]
        if id(record) not in models:
            models[id(record)] = loaded(self.model, record.to_torch_state_dict())
        sent_model = models[id(record)]
        shared = shared_from_update(
            sent_model, returned.to_torch_state_dict(), self.training, num_images, self.layer_name
        )
        truth = None
        if self.score_labels:
            counts = reply_metric(reply, LABEL_COUNTS_KEY)
            if counts is not None:
                truth = torch.tensor(counts).round().long()
        return shared, truth

    # --- the rest is the wrapped strategy's -----------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def start(self, *args, **kwargs):
        """The wrapped strategy's rounds with the audit; the plot is drawn when they end, however
        they end."""
        try:
            return super().start(*args, **kwargs)
        finally:
            self.finish()
