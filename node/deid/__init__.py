"""De-identification on the node.

``dicomio`` locates elements as byte spans; ``engine`` applies the compiled
profile to one file; ``values`` derives pseudonyms, UIDs and date shifts from
the site secret; ``keys`` keeps the site's secrets; ``vault`` the encrypted
re-identification map; ``runner`` de-identifies a folder tree with a process pool.
"""
