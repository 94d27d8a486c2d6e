"""Integer bounds of the API's path, query and body parameters (issue 10).

Every id is a BIGINT in the database and every time a BIGINT of epoch milliseconds, so an
integer outside those ranges must be refused by the model (422 problem), before a driver
refuses to bind it (a 500 and a reset connection).
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import Path
from pydantic import Field

from protocols.limits import INT64_MAX, TS_MAX_MS

ID_MAX: Final = INT64_MAX
# Query times: what record times may be (protocols.limits), and as far back.
TIME_MIN_MS: Final = -TS_MAX_MS
TIME_MAX_MS: Final = TS_MAX_MS

IdPath = Annotated[int, Path(ge=1, le=ID_MAX)]  # a row id in a path
IdField = Annotated[int, Field(ge=1, le=ID_MAX)]  # a row id in a body
