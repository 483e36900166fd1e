"""The stream pipeline: ring buffer -> features -> scorer -> calibrator -> episodes -> events.

Imports neither paho nor the outbox: the daemon, replay and the benchmarks all
drive ``StreamPipeline`` the same way.
"""

from __future__ import annotations

from agent.pipeline.events import Drift, Episode, Event, ScoreBatch, Summary
from agent.pipeline.stream import StreamPipeline, fingerprint

__all__ = ["Drift", "Episode", "Event", "ScoreBatch", "StreamPipeline", "Summary",
           "fingerprint"]
