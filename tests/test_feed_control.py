"""The bookkeeping by which an ingestion actor knows its current feed: a rewind asked of a feed
the supervisor has started but the actor has not begun yet waits for that feed instead of being
taken by the older one about to end (a line then waited for frames no feed sent: a live job hung
once in CI after an ingest restart followed by a writer restart)."""
from actors.feed_control import FeedControl


def test_a_rewind_for_a_feed_not_begun_yet_is_taken_by_that_feed_not_the_older_one():
    control = FeedControl()
    assert control.begin(1)
    # the supervisor started feed 2 from positions read before l1 restored, then rewound l1 in it
    assert control.rewind("l1", 4, feed=2)
    assert control.take(1) == ({}, set())  # feed 1, still running, leaves it alone
    assert control.begin(2) and not control.is_current(1)
    assert control.take(2) == ({"l1": 4}, set())
    assert control.take(2) == ({}, set())  # taken once


def test_a_feed_older_than_the_newest_begun_does_not_begin():
    control = FeedControl()
    assert control.begin(3)
    assert not control.begin(2) and control.is_current(3)


def test_a_rewind_for_an_ended_or_replaced_feed_is_refused_so_that_a_new_feed_starts():
    control = FeedControl()
    assert control.begin(1) and control.running
    assert control.rewind("a", 2, feed=1)
    assert not control.end_unless_asked(1)  # a finite source's feed with a rewind waiting goes on
    assert control.take(1) == ({"a": 2}, set())
    assert control.end_unless_asked(1) and not control.running
    assert not control.rewind("a", 0, feed=1)
    assert control.begin(2)
    assert not control.rewind("a", 0, feed=1)


def test_rewinds_for_a_feed_that_never_began_are_forgotten_by_the_next():
    # sent to an ingest actor that died before it began feed 1: feed 2 starts from positions
    # that already include them, and must not jump a line forward to an old seq
    control = FeedControl()
    assert control.rewind("a", 7, feed=1)
    assert control.begin(2)
    assert control.take(2) == ({}, set())


def test_a_dropped_line_is_let_go_and_a_rewind_feeds_it_again():
    control = FeedControl()
    assert control.drop("a", feed=1) is None  # no feed runs: nothing to ask
    assert control.begin(1)
    assert control.drop("a", feed=1) is None
    assert control.take(1) == ({}, {"a"})
    control.let_go("a", 1, 9)
    assert control.drop("a", feed=1) == 9 and control.take(1) == ({}, set())
    assert control.rewind("a", 9, feed=1)
    assert control.take(1) == ({"a": 9}, set()) and control.drop("a", feed=1) is None


def test_a_drop_is_answered_by_the_feed_the_caller_started_last():
    # feed 1 let the line go, but feed 2 (asked for, not begun) starts from positions that hold it
    control = FeedControl()
    assert control.begin(1) and control.drop("a", feed=2) is None
    control.let_go("a", 1, 5)
    assert control.drop("a", feed=2) is None
    assert control.begin(2) and control.take(2) == ({}, {"a"})
    control.let_go("a", 2, 5)
    assert control.drop("a", feed=2) == 5


def test_a_feed_that_stops_hands_back_the_rewinds_it_did_not_take_and_refuses_later_ones():
    # a line restored while the feed was stopping: the feed reports the line where it now stands
    control = FeedControl()
    assert control.begin(1) and control.rewind("a", 3, feed=1)
    assert control.end(1) == {"a": 3}
    assert not control.rewind("a", 2, feed=1) and not control.running
    assert control.end(1) == {}
