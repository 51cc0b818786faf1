import pytest

from tinyllm.runtime.scheduler import QueueFull, Scheduler, SchedulerConfig


def drain(s: Scheduler, n: int, tokens_each: int = 10) -> list[str]:
    """Admit n requests one at a time, charging each its tokens and finishing it."""
    order = []
    for _ in range(n):
        picked = s.next(lambda _: True)
        assert picked is not None
        tenant, _item = picked
        s.charge(tenant, tokens_each)
        s.finished(tenant)
        order.append(tenant)
    return order


def test_fair_share_follows_weights() -> None:
    s = Scheduler(SchedulerConfig(max_queue=1000))
    s.tenant("a", weight=1.0)
    s.tenant("b", weight=3.0)
    for i in range(200):
        s.enqueue("a", i)
        s.enqueue("b", i)
    order = drain(s, 100)
    assert 70 <= order.count("b") <= 80  # 3:1 share


def test_priority_first_and_concurrency_limits() -> None:
    s = Scheduler(SchedulerConfig(max_queue=100))
    s.tenant("low")
    s.tenant("high", priority=1, max_concurrency=2)
    for i in range(5):
        s.enqueue("low", i)
        s.enqueue("high", i)
    picks = [s.next(lambda _: True)[0] for _ in range(4)]
    assert picks == ["high", "high", "low", "low"]  # high is capped at 2 running


def test_a_tenant_that_was_idle_earns_no_credit() -> None:
    s = Scheduler(SchedulerConfig(max_queue=1000))
    for i in range(50):
        s.enqueue("a", i)
    drain(s, 30)
    for i in range(50):
        s.enqueue("b", i)
    order = drain(s, 20)
    assert 8 <= order.count("b") <= 12  # b alternates with a instead of taking 20 in a row


def test_queue_limit_and_latency_governor_reject_with_retry_after() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_queue=3, target_itl_p95=0.05, window=8))
    for i in range(3):
        s.enqueue("a", i)
    with pytest.raises(QueueFull) as e:
        s.enqueue("a", 3)
    assert e.value.retry_after >= 1 and s.rejected == 1
    for _ in range(8):  # steps far over the target shrink the batch
        s.observe_step(0.2)
    assert s.batch_cap < 8
    cap = s.batch_cap
    t = Scheduler(SchedulerConfig(max_batch=8, max_queue=100, target_itl_p95=0.05, window=8))
    t.batch_cap = 2
    t.enqueue("a", 0)
    t.enqueue("a", 1)
    with pytest.raises(QueueFull, match="latency"):  # throttled and already two waiting
        t.enqueue("a", 2)
    for _ in range(40):  # fast steps let it grow back
        s.observe_step(0.01)
    assert s.batch_cap > cap


def test_each_tenant_has_its_own_share_of_the_queue() -> None:
    s = Scheduler(SchedulerConfig(max_queue=6))
    s.tenant("a")
    s.tenant("b")
    s.tenant("c", max_queue=1)  # its own quota
    for i in range(2):
        s.enqueue("a", i)
    with pytest.raises(QueueFull, match="tenant 'a'"):  # a's share: 6 // 3 = 2
        s.enqueue("a", 2)
    s.enqueue("b", 0)  # b is not locked out by a
    s.enqueue("c", 0)
    with pytest.raises(QueueFull, match="tenant 'c'"):
        s.enqueue("c", 1)
    s.enqueue("b", 1)
    assert s.waiting == 5


def test_a_head_that_does_not_fit_does_not_block_other_tenants() -> None:
    s = Scheduler(SchedulerConfig(max_queue=100))
    s.tenant("big", priority=1)
    s.tenant("small")
    s.enqueue("big", "huge")
    s.enqueue("small", "tiny")
    fits = lambda item: item != "huge"  # noqa: E731
    assert s.next(fits) == ("small", "tiny")
    assert s.next(fits) is None  # the big request waits for room, first in line
    assert s.next(lambda _: True) == ("big", "huge")
