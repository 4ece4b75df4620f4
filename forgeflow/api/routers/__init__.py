"""REST and WebSocket routers, one module per resource."""
