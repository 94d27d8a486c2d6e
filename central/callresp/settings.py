"""Settings of the 叫应 workflow: `[central.callresp]` in central's TOML file.

    [central.callresp]
    deadline_red_s = 300      # no answer this long after a send: re-send (then escalate)
    resends = 3
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protocols.callresp import MAX_REPEAT, Level


class CallRespSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_red_s: float = Field(default=300.0, gt=0, le=86_400)
    deadline_orange_s: float = Field(default=600.0, gt=0, le=86_400)
    deadline_yellow_s: float = Field(default=1800.0, gt=0, le=86_400)
    deadline_blue_s: float = Field(default=3600.0, gt=0, le=86_400)
    resends: int = Field(default=3, ge=0, le=20,
                         description="re-sends before escalating one area up")
    repeat: int = Field(default=3, ge=1, le=MAX_REPEAT, description="default plays per send")
    tick_s: float = Field(default=0.5, gt=0, le=10, description="longest sleep of the scheduler")
    late_after_s: float = Field(default=2.0, gt=0, description="a step this late is counted late")

    def deadline_ms(self, level: Level | str) -> int:
        return round(getattr(self, f"deadline_{Level(level)}_s") * 1000)
