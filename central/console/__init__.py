"""The duty console's read side (issue 12): its API, live feed and the 一张图 overview."""
