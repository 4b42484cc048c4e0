"""`inferq gateway`: the OpenAI HTTP API in front of the queue (light install: no torch).

Every request becomes an ordinary inferq task on the durable queue, so a worker that dies takes no request
with it, and workers scale behind one Redis. ``shapes.py`` turns OpenAI request bodies into task kwargs and
results into OpenAI responses; ``app.py`` is the ASGI app (routes, keys, errors in OpenAI's shape).
"""
