"""Calendar periods (day, week, month) in an IANA time zone: their bounds in ms and their names.

A period starts at local midnight of its first day (a week on Monday, ISO 8601) and ends where
the next one starts, so a day is 23 or 25 hours long on a daylight-saving change. Where midnight
does not exist (a zone that springs forward at 00:00) the period starts at the first instant of
the day: ``zoneinfo`` maps the missing wall time with the offset before the change (PEP 495,
``fold=0``), which lands on that instant.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

Calendar = Literal["day", "week", "month"]
# A period's counter outlives its end by this much: replicas' clocks may differ a little.
PERIOD_GRACE_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Period:
    start_ms: int
    end_ms: int
    label: str  # names the period in counter keys: d20261201, w20261130 (its Monday), m202612


def _midnight(day: dt.date, zone: ZoneInfo) -> int:
    local = dt.datetime(day.year, day.month, day.day, tzinfo=zone)
    return int(local.timestamp()) * 1000


def _first_day(day: dt.date, calendar: Calendar) -> tuple[dt.date, dt.date, str]:
    if calendar == "day":
        return day, day + dt.timedelta(days=1), f"d{day:%Y%m%d}"
    if calendar == "week":
        monday = day - dt.timedelta(days=day.weekday())
        return monday, monday + dt.timedelta(days=7), f"w{monday:%Y%m%d}"
    first = day.replace(day=1)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    return first, following, f"m{first:%Y%m}"


def period_of(calendar: Calendar, zone: ZoneInfo, now_ms: int) -> Period:
    """The period of ``calendar`` in ``zone`` that contains the instant ``now_ms``."""
    local_day = dt.datetime.fromtimestamp(now_ms / 1000, zone).date()
    first, following, label = _first_day(local_day, calendar)
    start, end = _midnight(first, zone), _midnight(following, zone)
    if now_ms < start:  # only where midnight is skipped and now is just before the jump
        first, following, label = _first_day(first - dt.timedelta(days=1), calendar)
        start, end = _midnight(first, zone), _midnight(following, zone)
    return Period(start, end, label)


class PeriodClock:
    """``period_of`` with the current period remembered: one comparison per call on the hot path."""

    def __init__(self, calendar: Calendar, zone: ZoneInfo) -> None:
        self.calendar = calendar
        self.zone = zone
        self._current = Period(0, 0, "")

    def at(self, now_ms: int) -> Period:
        current = self._current
        if current.start_ms <= now_ms < current.end_ms:
            return current
        period = period_of(self.calendar, self.zone, now_ms)
        if now_ms >= current.end_ms:  # keep the newest: settles of old requests ask for the past
            self._current = period
        return period
