"""Azure ML on loopback HTTPS for the real azure-ai-ml client: the server (``server``), its TLS certificate
(``tls``) and the client-side set-up (``client``)."""
