"""`central demo`: the whole system on one machine, with its embedded broker and the 三断 link
switch."""
